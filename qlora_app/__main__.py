from qlora_app.cli import main

main()
