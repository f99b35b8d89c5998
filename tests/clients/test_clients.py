"""Drives a running `sdserve serve` through the REAL client packages, `webuiapi` (AUTOMATIC1111's
/sdapi/v1: test_webuiapi.py, test_webuiapi_images.py) and `openai` (/v1, test_openai.py),
unmodified, on the tiny test model, against one server (clientkit.py).

Every image that comes through a dialect must hold exactly the pixels that the native
`POST /generate` gives for the same parameters (PNG decoded, pixels compared).

Run by tests/clients/run.sh (which makes the virtual environment); by hand:
    SDSERVE_BIN=target/debug/sdserve python tests/clients/test_clients.py
"""

import clientkit
import test_openai
import test_webuiapi
import test_webuiapi_images

if __name__ == "__main__":
    clientkit.main([test_webuiapi, test_webuiapi_images, test_openai])
