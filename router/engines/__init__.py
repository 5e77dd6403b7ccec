"""The engines behind the router: the backend seam, kvroute's Ray replicas and HTTP engines."""
