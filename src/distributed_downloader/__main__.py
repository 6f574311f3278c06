from distributed_downloader.cli import main

main()
