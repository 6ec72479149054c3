"""Kedro glue: catalog dataset types and project hooks. The library (``pilot.*``) never imports this."""
