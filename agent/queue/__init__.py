"""The Celery side: app factory, thin tasks, and the enqueue client."""
