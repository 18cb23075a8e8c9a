"""gRPC servicers: thin. They parse, call the domain, and map its errors to status codes."""
