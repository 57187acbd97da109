"""Small utilities below every other module: atomic writes, tensor accounting."""
