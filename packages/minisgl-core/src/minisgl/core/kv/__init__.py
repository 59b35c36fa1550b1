"""The paged KV cache: the pool of K/V pages, its free list, the device token and page tables, and the
owners of pages (radix or naive prefix cache, running requests)."""
