"""The study database: the state machine, the SQLAlchemy tables, and typed access to them."""
