"""What hardens or extends MONAI Label for this app: starting the server, the request guard, safe datastores,
authentication, background jobs, interactive priority, the web front door and DICOMweb.

Above the core (stage one, stage two): nothing outside ``server``, ``tasks``, the command line and the app imports it.
"""
