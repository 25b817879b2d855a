"""The report page around the sections (aelab.stages.report): the Jinja2 template ``aelab/templates/report.html.j2``
(inline CSS, no scripts, no external resources), autoescaped, undefined names an error."""

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

# select_autoescape() alone goes by the last suffix: ".j2" would turn escaping off
ENV = Environment(loader=PackageLoader("aelab", "templates"), autoescape=select_autoescape(("html", "html.j2")),
                  undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
PAGE = ENV.get_template("report.html.j2")
