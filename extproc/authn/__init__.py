"""Authentication: each method is one `Authenticator`; the first that succeeds wins."""
