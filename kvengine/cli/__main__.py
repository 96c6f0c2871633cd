from kvengine.cli import main

main()
