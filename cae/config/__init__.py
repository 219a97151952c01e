"""What a trial and a sweep are: validated configs (pydantic), the catalogs of datasets and
tasks, the named presets, grid points and YAML. Torch-free and Ray-free."""
