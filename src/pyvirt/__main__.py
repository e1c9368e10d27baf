from pyvirt.cli import main

main()
