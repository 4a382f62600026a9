"""Programs that are clients of the server (`plumbline verify`), kept out of the server package:
they talk HTTP to a server and borrow only helpers from the gateway (reading a weights file,
token bytes), imported lazily."""
