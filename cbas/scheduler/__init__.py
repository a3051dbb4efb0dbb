"""Pure scheduling: placement policies and the spot trace reader."""
