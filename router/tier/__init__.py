"""A tier of routers: peers' decisions shared so each router predicts the others' placements."""
