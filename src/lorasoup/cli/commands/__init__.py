"""One module per command family; each command parses, loads its config, makes one library call, prints."""
