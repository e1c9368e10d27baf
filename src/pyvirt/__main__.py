from pyvirt.cli.main import main

main()
