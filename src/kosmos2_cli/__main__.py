from kosmos2_cli.cli import app

app(prog_name="kosmos2")
