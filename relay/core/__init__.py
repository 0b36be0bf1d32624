"""Pure core: no trio, no psycopg, no sockets, no clock reads."""
