"""Links: the shared pages and doorbells a channel runs over (LocalLink, GrantLink)."""
