"""Files copied as they are into artifacts, for readers that do not have this package."""
