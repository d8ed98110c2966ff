"""Files: ONNX in and out (:mod:`~bnfold.io.fileio`: load with one-line errors, atomic save),
checks before anything is read (:mod:`~bnfold.io.filechecks`), external data
(:mod:`~bnfold.io.external_data`), crash-safe graph + data writes (:mod:`~bnfold.io.staged_save`)
and folders of models (:mod:`~bnfold.io.folderscan`)."""
