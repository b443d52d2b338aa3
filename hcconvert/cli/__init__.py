"""The front end: the hcconvert command, its reports, and the demo."""
