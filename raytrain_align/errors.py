"""The one exception users see: a one-line message that names the fix."""


class RecipeError(Exception):
    """Bad input (recipe, flag, path, cluster). The CLI prints `error: <message>` and exits 2, writing nothing."""
