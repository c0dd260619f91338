"""The on-disk contracts between stages (one typed class, one writer, one reader each), and what
every stage reads and writes with: storage URIs, stable ids, input readers, safe image decode."""
