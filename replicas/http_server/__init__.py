"""One replica as a vLLM-shaped HTTP server (`kvroute serve-replica`), without Ray."""
