"""The submission: the generated single-file `train_gpt.py` (`bundle`), the records folder (`build`,
`readme`, `runs`) and the significance test a record claims (`stats`, `pgolf stats`).

`pgolf submission build RUN_ID ... --out records/track_10min_16mb/<date>_<slug>/` writes README.md,
submission.json, the train logs, requirements.txt and train_gpt.py, refusing runs with mixed configs
and a total (model + shipped code) over the 16,000,000-byte cap.
"""
