"""Knowledge-base storage and serving in the worker: documents in JetStream, ingestion jobs, the index library."""
