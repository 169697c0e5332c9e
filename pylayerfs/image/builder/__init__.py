"""The image builder: Dockerfile steps become layers and images, as Docker's classic builder makes them."""
