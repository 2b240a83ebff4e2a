"""The district fleet: scenario files, lightweight agents on the real outbox and publisher, faults,
and an accounting report read back from the database (``campus-sim``)."""
