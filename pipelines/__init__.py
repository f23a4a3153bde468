"""KFP pipelines: wiring only (the DAG, parameters, resources, caching, volumes)."""
