"""The control plane: API objects, controllers, backends, REST API and the `cdi` command."""
