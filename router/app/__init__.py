"""The application around the router: config loading, launch, CLI, client and reports."""
