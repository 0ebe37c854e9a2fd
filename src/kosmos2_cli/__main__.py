from kosmos2_cli.cli.app import app

app(prog_name="kosmos2")
