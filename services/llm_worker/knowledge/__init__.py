"""A tenant's knowledge: parse documents, chunk, index with BM25, retrieve, and ground or extract answers."""
