"""Python package of the bundle: losses, data, transforms, handlers and inference."""
