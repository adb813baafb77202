"""One module per CLI verb: a path in, a file out. The CLI calls these and nothing below them."""
