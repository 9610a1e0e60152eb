"""Every change acsr-metrics makes to Faust's and aiokafka's behaviour, in one place
(see README.md in this folder)."""
