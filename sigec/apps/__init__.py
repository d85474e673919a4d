"""Applications built on sigec's public API: the model zoo, the SDEdit loop, the demo and the
benchmark driver, the Ray Serve server. Nothing in the compiler or the runtime imports this package."""
