import os

from tailorlm.cli import main

if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    # Under torchrun: its failure summary then shows the failing rank's exception, not only an exit code.
    from torch.distributed.elastic.multiprocessing.errors import record

    main = record(main)

raise SystemExit(main())
