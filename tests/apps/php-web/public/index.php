<?php
// Served by uWSGI's php plugin from the Procfile's `php: public` line.
header("Content-Type: text/plain");
echo "php-web v1 php=" . PHP_VERSION . " app=" . getenv("APP") . "\n";
