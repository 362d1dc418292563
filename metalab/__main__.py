from metalab.cli import main

main()
