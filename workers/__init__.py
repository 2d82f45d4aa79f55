"""embedq workers (`embedq.workers`): pull jobs from Redis, run the pooled
encoder in batches, write the cache and reply."""
