"""The Dash app: layout, pages and callbacks that only draw result objects."""
