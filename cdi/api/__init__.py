"""Typed CDI API objects and CDI's admission, defaulting and naming rules.

``objects`` loads and dumps objects by kind (models in ``meta``, ``core``,
``datavolume``, ``cdikinds``); ``validation`` is CDI's admission webhook;
``defaults`` renders a DataVolume's claim; ``cron`` parses DataImportCron
schedules; ``units`` converts quantities; ``kinds`` and ``errors`` describe the
API surface.
"""
