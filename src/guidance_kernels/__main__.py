from guidance_kernels.cli import main

main()
