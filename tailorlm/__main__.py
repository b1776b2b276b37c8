from tailorlm.cli import main

raise SystemExit(main())
