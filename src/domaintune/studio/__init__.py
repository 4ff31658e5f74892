"""domaintune studio: the web app over a project folder."""
