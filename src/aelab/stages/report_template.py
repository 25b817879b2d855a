"""The report page around the sections (aelab.stages.report): inline CSS, no scripts, no external resources."""

from string import Template

PAGE = Template("""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>$title</title>
<style>
  body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d2430; margin: 0;
         background: #f4f5f7; }
  main { max-width: 1120px; margin: 0 auto; padding: 24px 28px 60px; background: #fff; }
  h1 { margin: 0 0 4px; font-size: 26px; }
  h2 { margin: 0 0 6px; font-size: 20px; border-bottom: 1px solid #dde1e6; padding-bottom: 4px; }
  h4 { margin: 18px 0 6px; }
  section { margin: 34px 0; }
  .meta, .intro { color: #56606d; }
  .stage { font-size: 13px; font-weight: normal; color: #56606d; margin-left: 8px; }
  .status { font-size: 12px; font-weight: 600; padding: 2px 8px; border-radius: 10px; margin-left: 8px;
            vertical-align: middle; background: #d9f2e0; color: #17602c; }
  .incomplete .status, tr.incomplete td:nth-child(3) { background: #fff1cc; color: #7a5800; }
  .not-run .status, tr.not-run td:nth-child(3) { background: #f1f2f4; color: #6b7380; }
  tr.ran td:nth-child(3) { color: #17602c; }
  .error .status, tr.error td:nth-child(3) { background: #fde2e1; color: #9b1c1c; }
  .notrun, .missing { background: #fff8e1; border-left: 4px solid #e0a800; padding: 6px 10px; }
  table { border-collapse: collapse; margin: 10px 0 14px; font-size: 14px; }
  th, td { border: 1px solid #dde1e6; padding: 4px 10px; text-align: left; vertical-align: top; }
  th { background: #f4f5f7; }
  td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
  td.center, th.center { text-align: center; }
  code, pre { font-family: ui-monospace, "SFMono-Regular", Menlo, monospace; font-size: 13px; }
  td code, p code { background: #f4f5f7; padding: 0 3px; }
  pre { background: #f4f5f7; padding: 12px; overflow: auto; max-height: 520px; }
  figure { margin: 12px 0 18px; }
  figure img { max-width: 100%; height: auto; border: 1px solid #eceef1; }
  figcaption { color: #56606d; font-size: 13px; }
  td { word-break: break-word; }
</style>
</head>
<body>
<main>
<h1>$title</h1>
<p class="meta">$meta</p>
<h2>Overview</h2>
<p class="intro">What each part of the pipeline produced. Sections marked <em>not run</em> have no results yet and
name the command that makes them; <em>incomplete</em> ones are missing some of their files.</p>
<table class="overview"><thead><tr><th>section</th><th>DVC stage</th><th>status</th><th>result</th></tr></thead>
<tbody>$overview</tbody></table>
$sections
</main>
</body>
</html>
""")
