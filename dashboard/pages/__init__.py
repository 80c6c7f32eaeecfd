"""Dashboard pages: each module here calls ``dash.register_page`` and so appears in the top bar."""
