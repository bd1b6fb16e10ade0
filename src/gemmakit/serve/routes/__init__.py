"""The routes, one small APIRouter per concern; create_app includes them (all but /health behind the API key)."""
