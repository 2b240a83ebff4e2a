"""The database: connections, migrations, partitions, retention and rollup maintenance."""
